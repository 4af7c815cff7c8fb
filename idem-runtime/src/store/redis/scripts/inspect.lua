-- inspect: the record, Redis's clock and the record's time to live, in one reply (the operations
-- API; changes nothing).
-- KEYS[1]: the record. Reply: {record or false, {seconds, microseconds}, pttl in ms}.
return {redis.call('GET', KEYS[1]), redis.call('TIME'), redis.call('PTTL', KEYS[1])}
