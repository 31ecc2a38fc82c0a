"""JACTUS (METHOD.md section 7) in parts: calibration statistics (stats), union bases and what a rank
choice keeps (bases), global rank allocation (allocate). The transform that composes them is
wasi_compress.transforms.jactus.jactus_; the layer is wasi_compress.modules.jactus.JactusLinear."""
