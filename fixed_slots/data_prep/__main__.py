"""`python -m fixed_slots.data_prep build NAME --source=DIR --data_dir=DIR`: see cli.py."""
import sys

from fixed_slots.data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
