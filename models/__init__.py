"""MS-VLM and everything to train and evaluate it; knows tensors and arrays, never DICOM."""
