"""python -m lllmsd"""

from lllmsd.cli import main

main()
