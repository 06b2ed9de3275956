"""The training data path. One batch, in order: `config` (what to read: named datasets of a kind, `kinds`) ->
`wds` / `mds` (a reader per format, in DataLoader workers) -> the kind's processor, `laion` (pairs) / `mmc4`,
`documents` (interleaved; raw sample -> tokens, labels, uint8 images; helpers in `text`, `images`, `masking`,
`items`) -> `dual_loader` (B valid samples per dataset, `collate`d; the batch of every dataset, resume) ->
`dataspec` (microbatches with their host-computed indices; on the device, uint8 images -> floats).
"""
