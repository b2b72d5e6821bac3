-- wrk script: /recommend for random user ids (most known, some unknown).
-- usage: wrk -t2 -c1000 -d20s --latency -s benches/wrk/recommend.lua http://127.0.0.1:8080
math.randomseed(7)
request = function()
  local u = math.random(1, 110000)
  return wrk.format("GET", "/recommend/" .. u .. "?k=10")
end
