-- complete: mark done if this token holds the key, completed it already (a retry), or nobody
-- holds it (the lease lapsed and was not taken over, or the record is gone).
-- KEYS[1]: the record. ARGV[1]: token (16 bytes). ARGV[2]: output. ARGV[3]: keep in ms.
-- ARGV[4]: the lease's fingerprint field (a length byte, 0 or 16, and the fingerprint).
-- Replies: 1 done, 0 another token holds or completed the key, -1 not a record.
local v = redis.call('GET', KEYS[1])
if v then
  local tag = string.byte(v, 1)
  if tag == 68 then
    if string.sub(v, 2, 17) == ARGV[1] then return 1 end
    return 0
  elseif tag == 73 then
    if string.sub(v, 2, 17) ~= ARGV[1] then
      local n = string.byte(v, 18)
      local t = redis.call('TIME')
      local now = t[1] * 1000 + math.floor(t[2] / 1000)
      if tonumber(string.sub(v, 35 + n)) > now then return 0 end
    end
  elseif tag == 88 then
    -- Forgotten by an operator: the holder before it may not mark it.
    return 0
  elseif tag ~= 70 then
    return -1
  end
end
redis.call('SET', KEYS[1], 'D' .. ARGV[1] .. ARGV[4] .. ARGV[2], 'PX', ARGV[3])
return 1
