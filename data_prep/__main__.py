"""`python -m data_prep` from a checkout's root = `python -m fixed_slots.data_prep`."""
import sys

from fixed_slots.data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
