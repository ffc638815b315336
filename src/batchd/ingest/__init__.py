"""Getting input in: streaming multipart uploads, line splitting, validation, chunk planning."""
