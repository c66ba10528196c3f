"""The floor every wing stands on: params, file names, atomic I/O, process set-up and errors."""
