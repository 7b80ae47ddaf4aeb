"""`python -m appliance` runs the same CLI as the `appliance` script."""

from __future__ import annotations

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
