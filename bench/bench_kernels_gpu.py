"""Former name of the attention benchmark: runs bench/bench_attention_gpu.py with the same arguments.

    python bench/bench_kernels_gpu.py [options of bench_attention_gpu.py]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention_gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
