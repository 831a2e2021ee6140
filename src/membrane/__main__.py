from membrane.cli.entry import run

run()
