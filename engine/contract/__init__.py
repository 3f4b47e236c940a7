"""The contract every layer speaks: parameters, configs, engine<->worker messages, the wire codec,
outputs and public errors. Leaf modules: they import msgspec and numpy, never torch or another
stepweave layer, so a remote client can use them alone."""
