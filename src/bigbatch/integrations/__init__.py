"""Large-batch recipes inside other training frameworks.

* :mod:`bigbatch.integrations.lightning`: :class:`~bigbatch.integrations.lightning.LargeBatch`, a
  Lightning callback (``pip install bigbatch[lightning]``).
* Hugging Face Accelerate needs no adapter: :func:`bigbatch.large_batch` works on an
  ``Accelerator``'s loop as it is; see ``examples/accelerate_train.py``.
"""

from __future__ import annotations

__all__: list[str] = []
