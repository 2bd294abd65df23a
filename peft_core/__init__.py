"""peft-core: parameter-efficient fine-tuning with methods as plugins."""
