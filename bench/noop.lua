-- bench/shard.py: the cost of an EVALSHA call itself (a script that does nothing).
return 0
