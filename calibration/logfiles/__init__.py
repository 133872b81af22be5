"""Exit-log and model-card files (design contract, "Exit logs").

Four file forms hold the same data (n samples, K exits, C classes):

* **wide Parquet** / **JSON Lines**: one row per sample, ``request_id``, optional label,
  segment and ``ts`` columns, and ``exit_0`` ... ``exit_{K-1}``, each a list of C floats;
* **long Parquet**: one row per (sample, exit) with ``exit`` (int) and ``logits`` (list of C
  floats), the per-sample columns repeated on every row of the sample;
* **NPZ**: ``logits`` (n, K, C), optional ``labels`` (n,), ``seg_<name>`` (n,),
  ``request_id`` (n,) and ``ts`` (n,).

Token-level logs of a language model (a card with ``vocab_size``) have two more forms, read
into :class:`~exitwise.calibration.tokens.TokenLogs`: **tokens** Parquet (one row per token,
``exit_k_values``, ``exit_k_indices``, ``exit_k_lse`` per exit, group and position columns)
and **token NPZ** (``topk_values``, ``topk_indices``, ``lse``).

Every loader validates once, at this boundary, and raises
:class:`~exitwise.calibration.exceptions.LogFormatError` (or ``CardError`` for the card) whose
message names the file, the row (index and request id) or column, and what is wrong. Nothing
is dropped silently. Parquet is read with vectorised pyarrow/numpy code (list lengths come
from the offsets), so 10^6 x 12 x 10 logits load in seconds.

Modules, one job each:

* :mod:`.cards` — load, parse and write model cards (JSON or YAML);
* :mod:`.forms` — the forms: names, column layout, telling a file's form;
* :mod:`.readers` — :func:`~.readers.load_logs` for every form (JSON Lines and NPZ here);
* :mod:`.tables` — wide and long tables (Parquet read column by column, or Arrow) to logs;
* :mod:`.columns` — one column at a time to validated arrays, errors naming row and column;
* :mod:`.writers` — :func:`~.writers.write_logs` in any form, atomically;
* :mod:`.tokens` — the two token forms to :class:`~exitwise.calibration.tokens.TokenLogs`;
* :mod:`.token_columns` — token columns to arrays and the checks of the top-k data;
* :mod:`.token_writers` — the two token forms written, atomically.
"""
