from pgdoorman.cli import main

main()
