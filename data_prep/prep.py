# Thin command-line entry for `python -m data_prep.prep ...`; the logic (and `mgt prep`) lives in
# mgt_scale.data.prep.
import sys

from mgt_scale.data.prep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
