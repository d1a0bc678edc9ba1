"""dadpo: distil a large teacher LLM into a small student with daDPO.

Data flows pairs file -> dadpo.pairs -> dadpo.tokenization -> dadpo.scoring (teacher and
reference sentence log-probs) -> dadpo.cache (Parquet shards + manifest) -> dadpo.train,
whose objective is dadpo.loss.dadpo_loss.
"""

__version__ = "0.1.0"
