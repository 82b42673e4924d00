from dallm.cli import main

main()
