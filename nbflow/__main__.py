from nbflow.cli import main

main()
