"""A run's typed configuration: its sections and their checks (`sections`), the named presets (`presets`)."""
