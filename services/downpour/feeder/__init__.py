"""The data feeder: dataset readers, preprocessing and per-replica sharding.

``base`` holds the dataset interface and the array-backed datasets, ``datasets``
opens a dataset from a URI or path (``open_dataset``), ``bundled`` builds the
default dataset that ships with scikit-image, ``preprocess`` turns
raw images into float32 NCHW batches as a ``PreprocessSpec`` says, and
``sharding`` gives each model replica its own disjoint stream of indices.
"""
