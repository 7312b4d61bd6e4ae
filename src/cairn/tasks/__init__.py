"""Research tasks built on the library (the words task), kept out of its core."""
