"""Data for amdim.train and amdim.evaluate: the datasets (`datasets`, with the generated `shapes`)
and the batched augmentation that turns their images into views (`augment`)."""
