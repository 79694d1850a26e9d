from lmxd.cli import main

main()
