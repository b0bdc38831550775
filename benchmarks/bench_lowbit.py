"""Same as `gacq bench` (gacq/bench.py): latency of the real low-bit backends against bf16, side by side."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gacq.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
