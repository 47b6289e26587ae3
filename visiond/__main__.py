from visiond.cli.app import main

main()
