from dfzmq.cli import main

main()
