"""The training data path. One batch, in order: `config` (what to read) -> `wds` / `mds` (a reader per format,
in DataLoader workers) -> `laion` / `mmc4` (raw sample -> tokens, labels, uint8 images; helpers in `text`,
`images`, `masking`, `items`) -> `dual_loader` (collate B valid samples per dataset, the dual batch, resume)
-> `dataspec` (microbatches; on the device, uint8 images -> the model's vision_x).
"""
