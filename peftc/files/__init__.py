"""Stage 4, files: adapters in the PEFT layout (written and read back), screening of untrusted
files, atomic writes, checkpoints."""
