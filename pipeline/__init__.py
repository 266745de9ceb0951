"""What a vecpress job does: source validation and planning, sampling, training, encoding into
Lance fragments, the atomic commit and the recall evaluation. Runs without Prefect; Ray is used
only through `vecpress.pipeline.distributed`."""

import os as _os

# Lance logs a warning for every fragment written before the first commit; keep errors only.
_os.environ.setdefault("LANCE_LOG", "error")
