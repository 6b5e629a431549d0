from nbflow.cli.main import main

main()
