from construct.bench.cli import main

main()
