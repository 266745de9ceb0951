"""Pure compute for vecpress: numpy in, numpy out.

Codecs (faiss), exact nearest neighbours, top-k merging, recall metrics and synthetic data.
Nothing here touches files, Arrow, Ray or Prefect.
"""
