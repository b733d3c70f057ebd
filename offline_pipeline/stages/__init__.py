"""The pipeline's stages, one module each, in order:

corpus -> activations -> sweep -> choose -> train -> stats -> filter -> explain -> map -> evaluate -> database

Each stage reads its inputs' folders and writes only into its own (see `offline_pipeline.runner`).
The model runs once over the corpus (`activations`); every later stage works from that cache.
A stage's module also holds the readers later stages use of its outputs; `offline_pipeline.pipeline`
lists the stages with their inputs and configuration.
"""
