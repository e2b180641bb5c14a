"""The extension machinery: hook specifications, the Strategy base and registry, plugin discovery and run managers."""
