"""The harness: composing a cell (backbone x method x retention x tasks), running it through
lmms-eval, writing its results atomically, sweeping cells and gathering the paper's tables."""
