// lmbus dashboard: swaps in each page's live part as the server pushes it (server-sent
// events; the data is the HTML as a JSON string). Nothing else runs in the page.
(function () {
  "use strict";
  var url = document.body.getAttribute("data-events");
  var live = document.getElementById("live");
  if (!url || !live || !window.EventSource) {
    return;
  }
  var events = new EventSource(url);
  events.addEventListener("live", function (e) {
    live.innerHTML = JSON.parse(e.data);
    document.body.classList.remove("offline");
    document.body.setAttribute("data-updated", String(Date.now()));
  });
  events.onerror = function () {
    document.body.classList.add("offline");
  };
})();
