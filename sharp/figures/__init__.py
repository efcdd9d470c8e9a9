"""The paper's figures for every registered method (matplotlib, Agg backend; files only).

* :mod:`~sharp.figures.selection`: Fig. 5, the visual tokens each method keeps, on the frames
  (``scripts/show_selection.py``);
* :mod:`~sharp.figures.attention`: Fig. 2, the last token's attention over the visual positions in a
  shallow and a deep layer, for the video, an all-black video (PosC's bias) and after calibration
  (``scripts/show_attention.py``);
* :mod:`~sharp.figures.tables`: average score against TFLOPs for the harness tables
  (``scripts/make_tables.py --plot``);
* :mod:`~sharp.figures.curves`: the toy retention curves (accuracy against retention and TFLOPs);
* :mod:`~sharp.figures.report`: one Markdown report of a results folder (``scripts/report.py``).

The scripts are thin command lines over these functions.
"""
