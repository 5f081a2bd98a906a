"""Evaluations that reproduce Le et al. (2012)'s tables on this system.

    downpour eval faces [--positives DIR [--negatives DIR]] [--checkpoint DIR] [--test DIR]
                                               the object-neuron table, curves and report.html
    downpour eval supervised [--data D]        linear on features / from random / fine-tuned

``cli.add_eval_parser(subparsers)`` adds both to the ``downpour`` command.

Modules: ``common`` (in-process training, activations, single-neuron
classifiers), ``jobs`` (training through a ``downpour up`` cluster),
``neuronscore`` (the three measures of a face neuron), ``report`` (PNG
figures); the faces eval in ``faces`` (the run), ``faceviews`` (its data
by identity: folds, each fold's pool, test B and test A), ``facecategory``
(the faces or a user's object category), ``facenegatives`` (matched natural
crops, phase-scrambled objects, the face cascade's hard negatives),
``viewjitter`` (the views of an object both the pool and test B draw),
``facedata`` (the pool's frames, ZCA, a user's test folder), ``facenets`` (a
fold's data, networks and units), ``facebaselines`` (k-means and the
autoencoder), ``facefold`` (each row's neuron chosen on the training
identities), ``facestats`` (the bootstrap over identities) and
``facereport`` (its table, pictures and report.html); the supervised eval in
``supervised`` (the run), ``supdata`` (its data) and ``linear`` (the linear
classifiers on fixed features).

The package itself imports nothing: the launcher and the neurons service
read ``common.preprocess_for``, and that must not load the evaluations,
which start clusters through ``downpour.up``.
"""
