"""Shards: raw PDE files -> WebDataset shard directories (`python -m nestor_ds.shards`), and their one reader.

The data flow, file by file:
  ingest/     raw public layouts (FNO .mat, PDEBench, PDEArena, The Well) -> canonical [T, X, Y, C] trajectories
  build.py    plan shards, write them in worker processes, assemble the manifest (stats.py: channel statistics;
              output.py: the output directory's lock, leftovers and atomic swap)
  schema.py   the format itself: names, sample keys, member encodings and decoding, the manifest
  tar.py      the one reader of shard tars (member walk, samples by key, preadv/mmap reads)
  verify.py   check a built directory against its manifest; read.py: plain sequential read (tests, inspection)
  urls.py     shard datasets behind URLs (webdataset streams; grouped and decoded through tar.py / schema.py)
  cli.py      the command line

Nothing here imports torch: builder workers and `--verify` start fast. Training reads shards through
`nestor_ds.data`.
"""
