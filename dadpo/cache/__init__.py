"""The teacher cache: build it (`dadpo cache-teacher`, dadpo.cache.build) and read it (open_cache).

layout.py names, columns, versions · manifest.py what produced the numbers · shards.py shard files
(write, check, adopt, read) · passes.py tokenize once, then score one model per pass · models.py the
teachers and the reference from the flags · build.py the orchestration · claims.py one process per
worker index.
"""

from dadpo.cache.build import CacheSummary, cache_teacher
from dadpo.config import CacheTeacherConfig
from dadpo.cache.shards import Cache, open_cache

__all__ = ["Cache", "open_cache", "cache_teacher", "CacheTeacherConfig", "CacheSummary"]
