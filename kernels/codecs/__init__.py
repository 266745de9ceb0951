"""Trained vector codecs, one module per concern (import each name from its module; this
package re-exports nothing, so no import cycle can run through it):

- `spec`: the spec grammar (parse_spec, ParsedSpec, OPTIONS, CodecSpecError, MAX_NBITS,
  is_binary_spec), documented in its docstring.
- `build`: an untrained faiss index from a spec (build_index), and the spec checks made
  before any data is read (check_codec_spec, code_size_of).
- `train`: training a spec's index on a sample (train_index), k-means seeding, the parallel
  PQ training and the GPU k-means assignment.
- `codec`: the trained `Codec`: encode, decode, search over its codes, (de)serialise.
- `search`: the search over stored codes (search_codes, search_device): faiss's ADC or
  Hamming search, or a GEMM over the decoded codes where that pays, ties ranked by row.
- `tables`: look-up-table distances to additive codes, stored relative to a centroid or as
  they are (the inverted lists' codes).
- `grid`: the advisor's default candidate specs (default_grid).
"""
