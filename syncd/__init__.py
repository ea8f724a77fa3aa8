"""syncd: moves finished Earth2Studio results to S3 and records CloudFront signed URLs."""

__version__ = "0.1.0"
