"""Pure, replayable core: the workflow IR, events, the state machine. Imports nothing else of nbflow."""
