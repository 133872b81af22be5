"""Exit-log and model-card files (design contract, "Exit logs").

Four file forms hold the same data (n samples, K exits, C classes):

* **wide Parquet** / **JSON Lines**: one row per sample, ``request_id``, optional label,
  segment and ``ts`` columns, and ``exit_0`` ... ``exit_{K-1}``, each a list of C floats;
* **long Parquet**: one row per (sample, exit) with ``exit`` (int) and ``logits`` (list of C
  floats), the per-sample columns repeated on every row of the sample;
* **NPZ**: ``logits`` (n, K, C), optional ``labels`` (n,), ``seg_<name>`` (n,),
  ``request_id`` (n,) and ``ts`` (n,).

Every loader validates once, at this boundary, and raises
:class:`~exitwise.calibration.exceptions.LogFormatError` (or ``CardError`` for the card) whose
message names the file, the row (index and request id) or column, and what is wrong. Nothing
is dropped silently. Parquet is read with vectorised pyarrow/numpy code (list lengths come
from the offsets), so 10^6 x 12 x 10 logits load in seconds.

Modules, one job each:

* :mod:`.cards` — load, parse and write model cards (JSON or YAML);
* :mod:`.forms` — the four forms: names, column layout, telling a file's form;
* :mod:`.readers` — :func:`~.readers.load_logs` for every form (JSON Lines and NPZ here);
* :mod:`.tables` — wide and long tables (Parquet read column by column, or Arrow) to logs;
* :mod:`.columns` — one column at a time to validated arrays, errors naming row and column;
* :mod:`.writers` — :func:`~.writers.write_logs` in any form, atomically.
"""
