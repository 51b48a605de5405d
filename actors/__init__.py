"""The node: pykka actors that own sockets, timers and processes and drive the cores."""
