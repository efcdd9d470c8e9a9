"""Every method the harness compares ShaRP with, one module each (the design card's ``baselines/``).

This package is built as an outside package would be: its methods import only the public method API
of :mod:`sharp` (``PruningMethod``, ``ScorerMethod``, ``Selection``, ``budget``, ``split_budget``,
``layer_kwarg``, ``BackboneFacts`` and the contexts they are handed; ``tests/test_method_api.py``
checks it), and they are registered through the entry-point group ``sharp.methods`` in
``pyproject.toml``, never imported by ``sharp`` itself. Modules: ``fastv``, ``pdrop`` (PyramidDrop),
``feather``, ``framefusion``, ``visionzip``, ``holitom``, ``sharpv``; Table 3's combinations with ShaRP
are compositions declared in ``configs/method/visionzip_sharp.yaml`` and ``holitom_sharp.yaml``.
"""
