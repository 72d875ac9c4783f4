"""The command line: `autopar plan` (plan without the hardware) and, later, `autopar profile`."""
