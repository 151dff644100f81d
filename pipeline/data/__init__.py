"""Reading and shaping data: decoding, sampling, transforms, lists, feature folders. No model code."""
