from membrane.cli.main import main

main()
