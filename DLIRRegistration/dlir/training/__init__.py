"""Training stage stacks: configuration (THE defaults), data and synthetic pairs, the trainer, progress events, the job folder."""
